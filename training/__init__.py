"""The project's main job: a real trainer using ckptmgr (``python -m training``)."""
