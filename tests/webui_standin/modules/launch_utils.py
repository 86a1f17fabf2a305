"""Stand-in of ``modules.launch_utils``."""


def git_tag():
    return "v1.10.1"
