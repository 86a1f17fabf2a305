"""Stand-in of ``modules.scripts``: the loaded script files, where extensions find ``xyz_grid``."""

from collections import namedtuple

ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])

scripts_data = []
