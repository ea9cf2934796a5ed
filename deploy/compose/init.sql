-- Run once by the postgres image (docker-entrypoint-initdb.d) when its data volume is empty, in database `shop`.
-- The shop tables are those of testbed/stack.py (SHOP_DDL), which the tests and `python -m testbed demo --postgres` use.

CREATE TABLE public.refunds (id bigserial PRIMARY KEY, order_id bigint, amount double precision NOT NULL,
                             agent_id text, run_id text);
CREATE TABLE public.orders (id bigserial PRIMARY KEY, total double precision NOT NULL, items int NOT NULL,
                            status text NOT NULL DEFAULT 'paid', agent_id text, run_id text);
-- Deletes and updates must carry the whole old row (agent id, old total) in Debezium's `before`.
ALTER TABLE public.refunds REPLICA IDENTITY FULL;
ALTER TABLE public.orders REPLICA IDENTITY FULL;

-- Two agents, each logging in as its own role (deploy/compose/writeguard.yaml maps agent id X to role agent_X).
-- No password: they can log in only over the container's Unix socket, where the image trusts local users, e.g.
--   docker compose exec postgres psql -U agent_refund_bot -d shop
-- A quarantine revokes their writes on the two tables and ends their sessions; `writeguard release` grants back.
CREATE ROLE agent_refund_bot LOGIN;
CREATE ROLE agent_order_bot LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON public.refunds, public.orders TO agent_refund_bot, agent_order_bot;
GRANT USAGE ON SEQUENCE public.refunds_id_seq, public.orders_id_seq TO agent_refund_bot, agent_order_bot;
