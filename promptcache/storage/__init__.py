"""Where images and their metadata live: blob files, PostgreSQL, migrations."""
