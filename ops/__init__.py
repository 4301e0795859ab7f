"""The operator surface: the `promptcache` command (`cli`), the whole stack in the foreground
(`up`), the web process and its dashboard (`web`), the demo, `ab`, the status and maintenance
commands, and the embedded servers they start."""
