"""Stand-in of ``extensions-builtin/Lora/networks.py`` (WebUI 1.10.1): the Lora list and the weight backups the
built-in Lora keeps on each patched layer (``network_weights_backup``, ``network_current_names``)."""

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
                entry = SimpleNamespace(name=name, alias=name, filename=os.path.join(folder, filename), metadata={})
                available_networks[name] = entry
                available_network_aliases[name] = entry


def network_restore_weights_from_backup(self):
    backup = getattr(self, "network_weights_backup", None)
    if backup is not None:
        self.weight.copy_(backup)  # in place, like the real one: callers hold torch.no_grad()


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None
