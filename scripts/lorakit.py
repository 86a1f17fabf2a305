"""LoRA Kit's entry in the AUTOMATIC1111 WebUI, which imports every file in an extension's ``scripts/``.

It only makes ``lorakit_ext`` importable and registers the callbacks; everything else lives in the package.
"""

import os
import sys

EXTENSION_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if EXTENSION_ROOT not in sys.path:
    sys.path.insert(0, EXTENSION_ROOT)

from lorakit_ext.webui import callbacks  # noqa: E402  (needs the path above)

callbacks.register()
