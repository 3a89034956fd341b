"""The studio: Gradio UI, CLI and the composition of the engine's services."""
