"""Helpers shared by every stage and by the deployment code; they import nothing else of the project but each other."""
