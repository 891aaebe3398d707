// A real OAuth 2.0 authorization server for the broker's client-credentials tests: Node's
// oidc-provider (OpenID Certified), configured by tests/oauth_server.py through a JSON file:
//
//   {"issuer": "http://127.0.0.1:PORT", "port": PORT, "jwks": {"keys": [private JWK]},
//    "audience": "https://orders.test", "scopes": ["orders.read"], "token_ttl": 60,
//    "clients": [{client_id, client_secret | jwks, token_endpoint_auth_method}]}
//
// Access tokens are JWTs (RFC 9068) for the one resource server `audience`, which a client
// names with `resource` (RFC 8707) or, as Auth0 and others spell it, `audience`.
// Prints "listening PORT" once it accepts connections; logs one line per token issued.
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { pathToFileURL } from 'node:url';

// Where scripts/install-oidc-provider.sh put it (ES modules do not read NODE_PATH).
const { default: Provider, errors } = await import(
  pathToFileURL(`${process.env.OIDC_PROVIDER_HOME}/node_modules/oidc-provider/lib/index.js`).href
);

const cfg = JSON.parse(readFileSync(process.argv[2], 'utf8'));

const provider = new Provider(cfg.issuer, {
  clients: cfg.clients.map((c) => ({
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: cfg.scopes.join(' '),
    id_token_signed_response_alg: 'ES256', // the one signing key is an EC key
    ...c,
  })),
  jwks: cfg.jwks,
  scopes: cfg.scopes,
  ttl: { ClientCredentials: cfg.token_ttl },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // `audience` at the token endpoint is not one of oidc-provider's parameters: read it
      // from the request body, as the servers that spell the resource that way do.
      defaultResource: (ctx) => ctx.oidc.body?.audience || undefined,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => {
        if (resource !== cfg.audience) {
          throw new errors.InvalidTarget(`unknown resource server ${resource}`);
        }
        return {
          scope: cfg.scopes.join(' '),
          audience: cfg.audience,
          accessTokenTTL: cfg.token_ttl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'ES256' } },
        };
      },
    },
  },
});

// JWT access tokens are issued, opaque ones saved: one line per token either way.
for (const event of ['client_credentials.issued', 'client_credentials.saved']) {
  provider.on(event, (token) => {
    console.log(`issued client_id=${token.clientId} jti=${token.jti}`);
  });
}
provider.on('grant.error', (ctx, err) => {
  console.log(`refused ${err.message}: ${err.error_description || ''}`);
});

// With "tls": {"cert": PEM file, "key": PEM file}, HTTPS (the broker then verifies it).
const server = cfg.tls
  ? https.createServer(
    { cert: readFileSync(cfg.tls.cert), key: readFileSync(cfg.tls.key) },
    provider.callback(),
  )
  : http.createServer(provider.callback());
server.listen(cfg.port, '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
