"""The fan-out core: topics, their replay rings and catch-ups, and the hub that owns them.

No HTTP here: upstreams come in through the `Upstreams` interface the
composition root hands the hub, subscribers through the `Subscriber` protocol.
"""
