"""
The build of the native data client (``src/kapow/native/kapow.c``).

Everything else is declared in ``pyproject.toml``.  The client is one C file
compiled into an executable with ``$CC`` when it is set, else with
``musl-gcc`` when musl is installed, else with ``cc``; without a compiler, or
when compiling fails, the install goes on without it and handlers get the
Python client (``kapow server`` says which).

Handlers start it several times per request, so its start is what counts:

* It is linked statically where the C library allows it: a static executable
  starts without the dynamic loader.  (The GNU linker notes that a static
  ``getaddrinfo`` loads the system's name service modules at run time: it
  does so only for a data URL with a host name other than ``localhost``, on
  the machine that built it.)
* musl is preferred because the GNU C library probes the processor at every
  start (``cpuid``, dozens of times), and in a virtual machine each probe
  traps to the hypervisor: measured here, a static program that does nothing
  takes 0.7 ms to run with the GNU C library and 0.1 ms with musl.  With a
  Python on the GNU C library, ``KAPOW_GLIBC_TEXTS`` makes a musl build print
  the GNU library's texts for system errors, as the Python client does.
"""

import os
import platform
import shlex
import shutil
import subprocess

from setuptools import Command, setup
from setuptools.command.build import build

SOURCE = os.path.join("src", "kapow", "native", "kapow.c")
FLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra"]


def _compilers():
    """The compilers to try, in order, each as its command line."""
    if os.environ.get("CC"):
        return [shlex.split(os.environ["CC"])]
    return [["musl-gcc"], ["cc"]]


class build_native(Command):
    """Compile the native data client next to the package's modules."""

    description = "compile the native kapow get/set client"
    user_options = []

    def initialize_options(self):
        self.build_lib = None
        self.editable_mode = False
        self.target = None

    def finalize_options(self):
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))
        root = os.path.join("src", "kapow") if self.editable_mode else os.path.join(self.build_lib, "kapow")
        self.target = os.path.join(root, "native", "kapow")

    def run(self):
        if os.path.exists(self.target):  # never ship one an earlier build left
            os.unlink(self.target)
        compilers = [c for c in _compilers() if shutil.which(c[0]) is not None]
        if not compilers:
            self.announce(
                "no C compiler (%s): handlers will use the Python data client" % _compilers()[-1][0], 3
            )
            return
        os.makedirs(os.path.dirname(self.target), exist_ok=True)
        flags = [*FLAGS, "-DKAPOW_GLIBC_TEXTS"] if platform.libc_ver()[0] == "glibc" else FLAGS
        for compiler, link in ((c, link) for c in compilers for link in (["-static"], [])):
            argv = [*compiler, *flags, *link, "-o", self.target, SOURCE]
            self.announce(" ".join(argv), 2)
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode == 0:
                return
            if os.path.exists(self.target):
                os.unlink(self.target)
        self.announce(done.stderr, 3)
        self.announce("the native data client did not compile: handlers will use the Python one", 3)

    def get_source_files(self):
        return [SOURCE]

    def get_outputs(self):
        return [self.target] if self.target and os.path.exists(self.target) else []

    def get_output_mapping(self):
        return {}


class build_with_native(build):
    sub_commands = [*build.sub_commands, ("build_native", None)]


setup(cmdclass={"build": build_with_native, "build_native": build_native})
