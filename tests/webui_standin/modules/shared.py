"""Stand-in of ``modules.shared`` (WebUI 1.10.1): global state, options, command-line options, the loaded model."""

import time
from types import SimpleNamespace


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, **kwargs):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.refresh = refresh
        self.do_not_save = False

    def info(self, text):
        return self


def options_section(section_identifier, options_dict):
    for value in options_dict.values():
        value.section = section_identifier
    return options_dict


class Options:
    def __init__(self):
        object.__setattr__(self, "data", {"training_xattention_optimizations": False})
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value


class State:
    """The fields ``/internal/progress`` reads, with the WebUI's ``begin``/``end``/``interrupt``."""

    def __init__(self):
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.job = ""
        self.job_no = 0
        self.job_count = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.current_image = None
        self.id_live_preview = 0
        self.textinfo = None
        self.time_start = None

    def begin(self, job="(unknown)"):
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.current_image = None
        self.id_live_preview = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job

    def end(self):
        self.job = ""
        self.job_count = 0

    def interrupt(self):
        self.interrupted = True

    def assign_current_image(self, image):
        self.current_image = image
        self.id_live_preview += 1


cmd_opts = SimpleNamespace(lora_dir="", lowvram=False, api=False, nowebui=False, api_auth=None)
opts = Options()
state = State()
sd_model = None
