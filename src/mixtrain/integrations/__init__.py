"""Integrations with training frameworks (optional extras).

* :mod:`mixtrain.integrations.lightning` -- :class:`~mixtrain.integrations.lightning.MixTrainCallback`
  for PyTorch Lightning (``pip install 'mixtrain[lightning]'``).
"""
