"""sepo: selective, token-level preference optimization (SePO, arXiv 2408.13518).

The pipeline is visible in the tree: ``data`` -> oracle training (``stages.train``) -> ``stages.score``
-> ``stages.select`` -> policy training (``stages.train``) -> ``stages.evaluate``. The maths lives in
``sepo.core`` (pure torch, no model or config inside).
"""

__version__ = "0.1.0"
