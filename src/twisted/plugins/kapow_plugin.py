from twisted.application.service import ServiceMaker

kapow = ServiceMaker(
    "kapow",
    "kapow.tap",
    "Turn shell commands into HTTP APIs",
    "kapow",
)
