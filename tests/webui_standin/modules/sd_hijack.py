"""Stand-in of ``modules.sd_hijack``: cross-attention optimisations on/off (the WebUI swaps forward functions)."""

optimizations_applied = True


def undo_optimizations():
    global optimizations_applied
    optimizations_applied = False


def apply_optimizations(option=None):
    global optimizations_applied
    optimizations_applied = True
    return "stand-in"
