"""Run by the AUTOMATIC1111 WebUI on every start: install what LoRA Kit needs and the WebUI lacks, nothing else.

Fast when all is present (a few metadata look-ups). Never torch, never a version pin: every package here is small,
pure Python and installed with ``--no-deps``, so nothing the WebUI already has can be upgraded or downgraded.
"""

import sys

import launch

# distribution name -> why lorakit wants it
PACKAGES = {
    "prodigyopt": "the Prodigy optimizer (optimizer_type = Prodigy)",
    "lion-pytorch": "the Lion optimizer (optimizer_type = Lion)",
}
if sys.version_info < (3, 11):
    PACKAGES["tomli"] = "reading TOML presets on Python 3.10 (tomllib arrived in 3.11)"

for package, reason in PACKAGES.items():
    if not launch.is_installed(package):
        launch.run_pip(f"install --no-deps {package}", f"{package} for LoRA Kit: {reason}")
