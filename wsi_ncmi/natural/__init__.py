"""The natural-image track (CIFAR-100 / ImageNet-style ResNets trained with NCMI or a baseline loss).

Modules: ``data`` (``ImageDataModule`` and its sources), ``backbones`` (timm ResNets, local weights only),
``datasets`` (CIFAR-100 pickles, digits), ``module`` (``ImageModule``), ``evaluate`` (head / CC / LP protocols,
streamed), ``probe`` (the linear probe), ``run`` (evaluate a ``natural fit`` checkpoint), ``metric`` (the
Figure-2 study behind ``wsi-ncmi ncmi-metric``). Nothing is imported here, so ``import wsi_ncmi.natural.backbones`` stays light.

Layer: may import ``ncmi``, ``losses``, ``data``, ``metrics`` and ``training``; only the top layer
(``cli``, ``commands``, ``demo``) imports it (``tests/test_import_direction.py``).
"""
