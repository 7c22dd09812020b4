"""Reusable building blocks of adaseg: data, models, losses, metrics, tracking, runtime.

Nothing in here knows about DVC stages; ``pipelines`` imports ``components``, never the reverse.
"""
