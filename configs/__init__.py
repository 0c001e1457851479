"""Run configurations; default.py holds every field and its default, the others start from it."""
