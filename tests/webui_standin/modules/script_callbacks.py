"""Stand-in of ``modules.script_callbacks``: registration and the calls that fire the callbacks lorakit uses."""

callbacks = {"ui_tabs": [], "ui_settings": [], "app_started": [], "before_ui": []}


def clear_callbacks():
    for registered in callbacks.values():
        registered.clear()


def on_ui_tabs(callback, *, name=None):
    callbacks["ui_tabs"].append(callback)


def on_ui_settings(callback, *, name=None):
    callbacks["ui_settings"].append(callback)


def on_app_started(callback, *, name=None):
    callbacks["app_started"].append(callback)


def on_before_ui(callback, *, name=None):
    callbacks["before_ui"].append(callback)


def ui_tabs_callback():
    tabs = []
    for callback in callbacks["ui_tabs"]:
        tabs += callback() or []
    return tabs


def ui_settings_callback():
    for callback in callbacks["ui_settings"]:
        callback()


def app_started_callback(demo, app):
    for callback in callbacks["app_started"]:
        callback(demo, app)


def before_ui_callback():
    for callback in callbacks["before_ui"]:
        callback()
