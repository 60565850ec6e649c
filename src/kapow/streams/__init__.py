"""
WebSocket and event-stream routes (SPEC.md §11): a process per connection,
its stdout cut into messages or events, its stdin the messages received.
"""
