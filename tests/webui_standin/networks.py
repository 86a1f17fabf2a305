"""Stand-in of ``extensions-builtin/Lora/networks.py`` (WebUI 1.10.1): the Lora list and the weight backups the
built-in Lora keeps on each patched layer (``network_weights_backup``, ``network_current_names``). Each entry reads
its file's metadata the way ``network.NetworkOnDisk`` does (``sd_models.read_metadata_from_safetensors``: the
header's ``__metadata__``, values starting with ``{`` decoded as JSON; unreadable files get ``{}``), and its alias
is ``ss_output_name`` when present."""

import json
import os
from types import SimpleNamespace

from modules import shared

available_networks = {}
available_network_aliases = {}
loaded_networks = []
list_calls = 0


def list_available_networks():
    global list_calls
    list_calls += 1
    available_networks.clear()
    available_network_aliases.clear()
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for folder, _, files in os.walk(shared.cmd_opts.lora_dir):
        for filename in sorted(files):
            if filename.endswith((".safetensors", ".pt", ".ckpt")):
                name = os.path.splitext(filename)[0]
                path = os.path.join(folder, filename)
                metadata = read_metadata(path) if filename.endswith(".safetensors") else {}
                entry = SimpleNamespace(name=name, alias=metadata.get("ss_output_name", name), filename=path,
                                        metadata=metadata)
                available_networks[name] = entry
                available_network_aliases[name] = entry
                available_network_aliases[entry.alias] = entry


def read_metadata(path):
    try:
        with open(path, "rb") as file:
            header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
    except (OSError, ValueError):  # the WebUI reports the error and lists the file without metadata
        return {}
    metadata = dict(header.get("__metadata__", {}))
    for key, value in metadata.items():
        if isinstance(value, str) and value.startswith("{"):
            try:
                metadata[key] = json.loads(value)
            except ValueError:
                pass
    return metadata


def network_restore_weights_from_backup(self):
    backup = getattr(self, "network_weights_backup", None)
    if backup is not None:
        self.weight.copy_(backup)  # in place, like the real one: callers hold torch.no_grad()


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None
