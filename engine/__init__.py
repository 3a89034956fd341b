"""The studio's engine: jobs, training, inference and storage. Plain Python, never imports gradio."""
