"""Stand-in of ``scripts/xyz_grid.py`` (WebUI 1.10.1): the axis registry extensions append to."""


def format_value_add_label(p, opt, x):
    if type(x) == float:
        x = round(x, 8)
    return f"{opt.label}: {x}"


def format_value(p, opt, x):
    if type(x) == float:
        x = round(x, 8)
    return x


def apply_field(field):
    def fun(p, x, xs):
        setattr(p, field, x)
    return fun


class AxisOption:
    def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0, choices=None,
                 prepare=None):
        self.label = label
        self.type = type
        self.apply = apply
        self.format_value = format_value
        self.confirm = confirm
        self.cost = cost
        self.prepare = prepare
        self.choices = choices


axis_options = [
    AxisOption("Nothing", str, lambda p, x, xs: None),
    AxisOption("Seed", int, apply_field("seed")),
]


class Script:
    """The xyz_grid script class; the WebUI names its module ``xyz_grid.py`` (the file's base name)."""


Script.__module__ = "xyz_grid.py"
