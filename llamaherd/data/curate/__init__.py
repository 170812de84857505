"""Data curation: the Llama 3 filtering pipeline, stage by stage (see base.py for what a stage is)."""
