"""placeholder until inspect lands."""


def register(app):
    pass
