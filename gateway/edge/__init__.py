"""The downstream edge: what decides at the door (policy, auth) and the response that streams.

Admission, CORS, auth and Last-Event-ID checks, the stream a subscriber is
written through, its heartbeats and the access log.
"""
