-- Operators and waiting callers shared by the nodes of one store (src/dispatch/cluster.rs).
-- Only nodes sharing a PostgreSQL store use these tables; a single node on SQLite leaves
-- them empty. Times are Unix epoch milliseconds of the writing node's clock.

-- The operators' phones registered with some node: any node may ring them.
CREATE TABLE cluster_agents (
    agent_id   TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    -- The node that took the registration (its process id, see cluster.rs).
    node       TEXT COLLATE "C" NOT NULL,
    contact    TEXT COLLATE "C" NOT NULL,
    -- Where the REGISTER came from: 'udp:ADDR:PORT' (the edge, or the phone itself).
    flow       TEXT COLLATE "C" NOT NULL,
    -- When the phone's binding expires.
    expires_ms BIGINT NOT NULL
);

-- One node's hold on an operator: ringing, talking, wrapping up or paused there. No other
-- node offers the operator a call while the lease runs; a node renews its leases while it
-- lives, so a dead node's holds end with their lease.
CREATE TABLE cluster_claims (
    agent_id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    node     TEXT COLLATE "C" NOT NULL,
    lease_ms BIGINT NOT NULL
);

-- The callers each node has waiting for an operator, for serving them in arrival order
-- across the nodes.
CREATE TABLE cluster_waiting (
    node       TEXT COLLATE "C" NOT NULL,
    caller     BIGINT NOT NULL,
    queue      TEXT COLLATE "C" NOT NULL,
    skill      TEXT COLLATE "C",
    priority   BIGINT NOT NULL,
    arrived_ms BIGINT NOT NULL,
    lease_ms   BIGINT NOT NULL,
    PRIMARY KEY (node, caller)
);
