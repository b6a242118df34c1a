package handlers

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/openai-idempotent-proxy/proxy/handlers/access"
)

// ClientKey is one proxy key a client presents as "Authorization: Bearer …".
type ClientKey struct {
	Name string // shown in logs and the dashboard; never the key itself
	Key  string
}

// ParseClientKeys reads PROXY_API_KEYS: comma-separated entries, each "key"
// or "name:key". Unnamed keys are named after a short hash of the key, which
// identifies them without revealing them.
func ParseClientKeys(v string) ([]ClientKey, error) {
	var keys []ClientKey
	names := map[string]bool{}
	seen := map[string]bool{}
	for i, entry := range strings.Split(v, ",") {
		entry = strings.TrimSpace(entry)
		if entry == "" {
			continue
		}
		name, key, named := strings.Cut(entry, ":")
		if !named {
			name, key = "", entry
		}
		name, key = strings.TrimSpace(name), strings.TrimSpace(key)
		switch {
		case key == "":
			return nil, fmt.Errorf("entry %d has an empty key", i+1)
		case len(key) < 8:
			return nil, fmt.Errorf("entry %d: keys must be at least 8 characters", i+1)
		case strings.ContainsAny(key, " \t"):
			return nil, fmt.Errorf("entry %d: keys must not contain spaces", i+1)
		case seen[key]:
			return nil, fmt.Errorf("entry %d repeats a key", i+1)
		}
		if name == "" {
			name = KeyFingerprint(key)
		}
		if names[name] {
			return nil, fmt.Errorf("entry %d repeats the name %q", i+1, name)
		}
		names[name], seen[key] = true, true
		keys = append(keys, ClientKey{Name: name, Key: key})
	}
	return keys, nil
}

// KeyFingerprint names a key by the first 8 hex digits of its SHA-256.
func KeyFingerprint(key string) string {
	sum := sha256.Sum256([]byte(key))
	return "key-" + hex.EncodeToString(sum[:4])
}

// Authenticator checks client keys. It keeps only their SHA-256 digests and
// compares digests in constant time against every key, so neither timing nor
// memory reveals a key.
type Authenticator struct {
	digests []SecretDigest
	names   []string
}

// NewAuthenticator builds an Authenticator over keys.
func NewAuthenticator(keys []ClientKey) *Authenticator {
	a := &Authenticator{}
	for _, k := range keys {
		a.digests = append(a.digests, DigestSecret([]byte(k.Key)))
		a.names = append(a.names, k.Name)
	}
	return a
}

// ErrNoKey (no "Bearer <key>") and errBadKey are the two ways
// authentication fails; ErrNoKey is the access gate's, which says the same.
var (
	ErrNoKey  = access.ErrNoKey
	errBadKey = errors.New("invalid client key")
)

// Authenticate returns the client name for the Authorization header value.
func (a *Authenticator) Authenticate(authorization []byte) (string, error) {
	const prefix = "bearer "
	if len(authorization) <= len(prefix) || !strings.EqualFold(string(authorization[:len(prefix)]), prefix) {
		return "", ErrNoKey
	}
	return a.AuthenticateDigest(DigestSecret(authorization[len(prefix):]))
}

// AuthenticateDigest is Authenticate for a bearer token already digested
// (the access gate's Options.Env).
func (a *Authenticator) AuthenticateDigest(token [sha256.Size]byte) (string, error) {
	got := SecretDigest(token)
	match := -1
	for i := range a.digests { // every key, so timing does not tell which matched
		if a.digests[i].matchesDigest(got) {
			match = i
		}
	}
	if match < 0 {
		return "", errBadKey
	}
	return a.names[match], nil
}
