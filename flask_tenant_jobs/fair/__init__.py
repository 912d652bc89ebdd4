"""Fair dispatch: a kombu Redis transport that delivers tenant tasks round-robin.

:mod:`.transport` holds the channel (publish into per-tenant lanes, deliver by
picking the next lane), :mod:`.scripts` the Lua scripts and the Redis key layout,
:mod:`.setup` how ``init_app`` selects the transport.
"""
