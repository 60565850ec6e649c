"""
poll_job.py: start a kapow job and wait for its result, as a CI system would.

    kapow server examples/deploy-job.pow &
    export DEPLOY_TOKEN=$(cat /tmp/kapow-deploy-job.tokens)
    python poll_job.py http://localhost:8080/deploy/staging v1.4.2

It POSTs the version to the job route with the bearer token, follows the
Location of the 202 answer to GET /_jobs/ID every POLL_SECONDS, printing each
state the job goes through (queued, running, done), then prints the job's
stderr (the end of it) and fetches /_jobs/ID/result: its status line on
standard error, its body on standard output. The exit status is 0 when the
result's status is below 400, else 1.
"""

import os
import sys
from urllib.parse import urljoin

import treq
from twisted.internet.task import deferLater, react

POLL_SECONDS = 1.0


async def main(reactor, url, version):
    token = os.environ.get("DEPLOY_TOKEN")
    if not token:
        raise SystemExit("poll_job: set DEPLOY_TOKEN to the route's bearer token")
    auth = {"Authorization": f"Bearer {token}"}

    started = await treq.post(url, data=version.encode(), headers=auth)
    if started.code != 202:
        raise SystemExit(f"poll_job: {url} answered {started.code}: {await started.text()}")
    job = await started.json()
    status_url = urljoin(url, started.headers.getRawHeaders("Location")[0])
    print(f"job {job['id']}", file=sys.stderr, flush=True)

    state = None
    while True:
        answer = await treq.get(status_url, headers=auth)
        if answer.code != 200:  # 404 Job Not Found: e.g. the server restarted without a history file
            raise SystemExit(f"poll_job: {status_url} answered {answer.code}: {await answer.text()}")
        record = await answer.json()
        if record["state"] != state:
            state = record["state"]
            print(f"{state}", file=sys.stderr, flush=True)
        if state == "done":
            break
        await deferLater(reactor, POLL_SECONDS)

    for line in record["stderr_tail"].splitlines():
        print(f"  | {line}", file=sys.stderr)
    result = await treq.get(status_url + "/result", headers=auth)
    body = await result.content()
    cut = " (cut at --job-output-max)" if record["truncated"] else ""
    print(f"result: {result.code} {result.phrase.decode('latin-1')}{cut}", file=sys.stderr, flush=True)
    sys.stdout.buffer.write(body)
    sys.stdout.flush()
    if result.code >= 400:
        raise SystemExit(1)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: poll_job.py JOB_ROUTE_URL VERSION")
    react(main, sys.argv[1:])
