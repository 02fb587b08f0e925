-- Prosody 0.12 for ipop: accounts, rosters, group rooms that show real JIDs, and STUN/TURN
-- servers with time-limited credentials (XEP-0215). This is a whole prosody.cfg.lua.
--
-- Replace the placeholders:
--   @DOMAIN@       the domain of the accounts (alice@@DOMAIN@)
--   @TURN_HOST@    the name of the coturn server (the name in its TLS certificate)
--   @TURN_SECRET@  coturn's static-auth-secret
--
-- Certificates are found in /etc/prosody/certs: @DOMAIN@.crt and @DOMAIN@.key, valid for
-- @DOMAIN@ and conference.@DOMAIN@ (`prosodyctl --root cert import /etc/letsencrypt/live`
-- copies them there from certbot).

-- Where Debian's prosody.service expects it. Prosody logs to its standard output, which
-- systemd keeps in the journal (journalctl -u prosody).
pidfile = "/run/prosody/prosody.pid"

-- Clients connect with STARTTLS on port 5222 and other servers on 5269 (the defaults); friends
-- on other domains reach your users through 5269. For TLS from the first byte on 5223 as well
-- (ipop's tls = "direct"), add: c2s_direct_tls_ports = { 5223 }

modules_enabled = {
	"roster";            -- contact lists: friends are contacts with a mutual subscription
	"saslauth";          -- login with SCRAM
	"tls";               -- STARTTLS
	"disco";             -- service discovery
	"ping";              -- keepalives (XEP-0199)
	"limits";            -- bandwidth limits, below
	"external_services"; -- STUN and TURN servers with time-limited credentials (XEP-0215)
	"smacks";            -- stream management (XEP-0198): a short outage loses no stanza
	"admin_shell";       -- prosodyctl shell
}

-- Passwords are stored as SCRAM hashes; nothing travels unencrypted.
authentication = "internal_hashed"
c2s_require_encryption = true
allow_unencrypted_plain_auth = false
s2s_require_encryption = true
s2s_secure_auth = true

-- Prosody's default rate limit is made for chat; link set-up needs more at times.
limits = {
	c2s = { rate = "10mb/s" };
}

-- STUN and TURN servers offered to every user. TURN credentials are derived from the secret
-- shared with coturn (its use-auth-secret and static-auth-secret) and last `ttl` seconds;
-- ipop asks for fresh ones before they expire. TURN over TLS ("turns") gets them only with
-- algorithm = "turn".
external_services = {
	{ type = "stun", transport = "udp", host = "@TURN_HOST@", port = 3478 };
	{ type = "turn", transport = "udp", host = "@TURN_HOST@", port = 3478, secret = "@TURN_SECRET@", ttl = 86400 };
	{ type = "turn", transport = "tcp", host = "@TURN_HOST@", port = 3478, secret = "@TURN_SECRET@", ttl = 86400 };
	{ type = "turns", transport = "tcp", host = "@TURN_HOST@", port = 5349, secret = "@TURN_SECRET@", ttl = 86400, algorithm = "turn" };
}

VirtualHost "@DOMAIN@"

-- Group rooms. ipop creates its rooms members-only, persistent and with real JIDs visible to
-- every occupant; rooms created by other clients show real JIDs too, so that ipop can tell
-- whose device is in the room. Only users of @DOMAIN@ may create rooms.
Component "conference.@DOMAIN@" "muc"
	muc_room_default_public_jids = true
	restrict_room_creation = "local"
