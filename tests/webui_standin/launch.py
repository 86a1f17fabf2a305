"""Stand-in of the WebUI's ``launch`` module as ``install.py`` sees it (``launch_utils.is_installed``/``run_pip``,
WebUI 1.10.1): looks packages up like the real one, and records what would be installed instead of running pip."""

import importlib.metadata
import importlib.util

pip_calls = []


def is_installed(package):
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        try:
            return importlib.util.find_spec(package) is not None
        except ModuleNotFoundError:
            return False


def run_pip(command, desc=None, live=False):
    pip_calls.append(command)
    return ""
