from twisted.application.service import ServiceMaker

kapow = ServiceMaker(
    "kapow",
    "kapow.server.assembly",
    "Turn shell commands into HTTP APIs",
    "kapow",
)
