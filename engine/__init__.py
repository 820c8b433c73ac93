"""The detection engine: the training state, one training epoch, evaluation, and the guards around a run.

Scripts (train.py, val.py) parse arguments and orchestrate; what they run lives here, where tests call it.
"""
