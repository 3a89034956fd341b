"""Video generation: typed requests (request.py), the warm worker process (worker.py) and its
pipeline/LoRA cache (pipeline.py), file export (export.py) and the service that queues requests
and places workers through the scheduler (service.py)."""
