-- Operators and waiting callers shared by the nodes of one store (src/dispatch/cluster.rs).
-- Only nodes sharing a PostgreSQL store use these tables; a single node on SQLite leaves
-- them empty. Times are Unix epoch milliseconds of the writing node's clock.

-- The operators' phones registered with some node: any node may ring them.
CREATE TABLE cluster_agents (
    agent_id   TEXT PRIMARY KEY NOT NULL,
    -- The node that took the registration (its process id, see cluster.rs).
    node       TEXT NOT NULL,
    contact    TEXT NOT NULL,
    -- Where the REGISTER came from: 'udp:ADDR:PORT' (the edge, or the phone itself).
    flow       TEXT NOT NULL,
    -- When the phone's binding expires.
    expires_ms INTEGER NOT NULL
) STRICT;

-- One node's hold on an operator: ringing, talking, wrapping up or paused there. No other
-- node offers the operator a call while the lease runs; a node renews its leases while it
-- lives, so a dead node's holds end with their lease.
CREATE TABLE cluster_claims (
    agent_id TEXT PRIMARY KEY NOT NULL,
    node     TEXT NOT NULL,
    lease_ms INTEGER NOT NULL
) STRICT;

-- The callers each node has waiting for an operator, for serving them in arrival order
-- across the nodes.
CREATE TABLE cluster_waiting (
    node       TEXT NOT NULL,
    caller     INTEGER NOT NULL,
    queue      TEXT NOT NULL,
    skill      TEXT,
    priority   INTEGER NOT NULL,
    arrived_ms INTEGER NOT NULL,
    lease_ms   INTEGER NOT NULL,
    PRIMARY KEY (node, caller)
) STRICT;
