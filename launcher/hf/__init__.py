"""The files launcher/hf_export.py copies into an export so that transformers loads it (torch and transformers
only; nothing here may import the project)."""
