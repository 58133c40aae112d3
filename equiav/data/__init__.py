"""Dataset files: the typed index of JSON/CSV/weights files, the checker, the synthetic generator.

Nothing here decodes media for training; that is ``dali_pipelines``' job.
"""
