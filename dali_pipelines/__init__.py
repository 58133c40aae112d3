"""DALI input pipelines: everything that turns media files into training tensors on the device.

One ``@pipeline_def`` per mode (pretrain, finetune, eval) sharing the decode and feature stages.
The same code picks GPU operators (``mixed``/``gpu``) when a device id is given and runs in DALI's
CPU-only mode (``device_id=None``) otherwise.
"""
