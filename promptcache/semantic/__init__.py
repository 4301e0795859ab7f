"""Semantic cache tier: embedding lookup guarded by a picture-difference verifier."""
