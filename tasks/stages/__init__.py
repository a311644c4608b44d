"""The stages of the fine-tuning DAG, one module each, declared once in ``flows/stages.py``."""
