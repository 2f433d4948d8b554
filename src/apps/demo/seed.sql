-- The demo's starting point: three organizations, two domains each, and their owners.
-- Applied once the replication slot exists, so these rows are the demo's first events.
-- Password hashes are fake (and redacted from events by the default mapping).

INSERT INTO organizations (id, name, plan, settings) VALUES
    ('quant',  'Quant Labs', 'enterprise', '{"sso": true,  "data_region": "eu-west-1"}'),
    ('acme',   'Acme Corp',  'team',       '{"sso": false, "data_region": "us-east-1"}'),
    ('globex', 'Globex',     'free',       '{"sso": false, "data_region": "ap-southeast-2"}');

INSERT INTO domains (id, organization_id, name, description) VALUES
    ('research',   'quant',  'Research',   'Signal research and backtesting agents'),
    ('trading',    'quant',  'Trading',    'Execution and risk agents'),
    ('support',    'acme',   'Support',    'Customer support assistants'),
    ('sales',      'acme',   'Sales',      'Lead qualification and outreach'),
    ('operations', 'globex', 'Operations', 'Incident response and on-call helpers'),
    ('labs',       'globex', 'Labs',       'Experiments that may or may not ship');

INSERT INTO users (id, organization_id, email, name, role, password_hash) VALUES
    ('usr-owner-quant',  'quant',  'owner@quant.example',  'Quinn Owner', 'owner',
     '$argon2id$v=19$m=19456,t=2,p=1$ZGVtby1zYWx0LXF1YW50$bm90LWEtcmVhbC1oYXNoLW9ubHktYS1kZW1v'),
    ('usr-owner-acme',   'acme',   'owner@acme.example',   'Avery Owner', 'owner',
     '$argon2id$v=19$m=19456,t=2,p=1$ZGVtby1zYWx0LWFjbWU$bm90LWEtcmVhbC1oYXNoLW9ubHktYS1kZW1v'),
    ('usr-owner-globex', 'globex', 'owner@globex.example', 'Gale Owner',  'owner',
     '$argon2id$v=19$m=19456,t=2,p=1$ZGVtby1zYWx0LWdsb2JleA$bm90LWEtcmVhbC1oYXNoLW9ubHktYS1kZW1v');
