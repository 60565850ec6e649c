"""
watch_handlers.py: add a route to a running kapow server, then watch its handlers.

Every second it lists the server's live handlers and prints what changed for
the route's: a handler that started (+), changed state (~) or went away (-).
Ctrl-C removes the route and stops.

    kapow server --write-control-credentials ~/.kapow/control &
    python watch_handlers.py ~/.kapow/control
    curl http://localhost:8080/slow        # in another shell

Without a directory it takes the credentials from the KAPOW_CONTROL_*
variables, as an init program can.  The control URL is $KAPOW_CONTROL_URL,
https://localhost:8081 by default.
"""

import os
import sys

from twisted.internet.task import deferLater, react

from kapow.client import DEFAULT_CONTROL_URL, ControlClient, ControlError, CredentialsError

ROUTE = "/slow"
COMMAND = "sleep 3; echo done | kapow set /response/body"


async def main(reactor, directory=None):
    try:
        if directory is None:
            client = ControlClient.from_environ(reactor)
        else:
            url = os.environ.get("KAPOW_CONTROL_URL") or DEFAULT_CONTROL_URL
            client = ControlClient.from_directory(reactor, url, directory)
        route = await client.add_route(ROUTE, COMMAND)
    except (CredentialsError, ControlError) as e:
        raise SystemExit(f"watch_handlers: {e}") from None
    print(f"added route {route['id']}: {route['method']} {route['url_pattern']}", flush=True)
    # When the reactor stops (Ctrl-C), it waits for the route's removal.
    reactor.addSystemEventTrigger("before", "shutdown", remove, client, route["id"])

    seen = {}
    while True:
        handlers = {h["id"]: h for h in await client.list_handlers() if h["route_id"] == route["id"]}
        for handler_id, handler in handlers.items():
            before = seen.get(handler_id)
            if before is None:
                print(
                    f"+ {handler_id} {handler['state']}: {handler['method']} {handler['path']}"
                    f" from {handler['remote']}",
                    flush=True,
                )
            elif before["state"] != handler["state"]:
                print(f"~ {handler_id} {before['state']} -> {handler['state']}", flush=True)
        for handler_id in seen.keys() - handlers.keys():
            print(f"- {handler_id} gone", flush=True)
        seen = handlers
        await deferLater(reactor, 1.0)


def remove(client, route_id):
    def removed(_):
        print(f"removed route {route_id}", flush=True)

    def failed(failure):
        print(f"watch_handlers: could not remove route {route_id}: {failure.value}", file=sys.stderr)

    return client.remove_route(route_id).addCallbacks(removed, failed)


if __name__ == "__main__":
    react(main, sys.argv[1:])
