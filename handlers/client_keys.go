package handlers

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/tidwall/gjson"
	"github.com/valyala/fasthttp"

	"github.com/openai-idempotent-proxy/proxy/handlers/access"
	"github.com/openai-idempotent-proxy/proxy/models"
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

// errNoKey and errBadKey are the two ways authentication fails.
var (
	errNoKey  = errors.New("missing client key")
	errBadKey = errors.New("invalid client key")
)

// Authenticate returns the client name for the Authorization header value.
func (a *Authenticator) Authenticate(authorization []byte) (string, error) {
	const prefix = "bearer "
	if len(authorization) <= len(prefix) || !strings.EqualFold(string(authorization[:len(prefix)]), prefix) {
		return "", errNoKey
	}
	got := DigestSecret(authorization[len(prefix):])
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

// ClientGate authenticates callers, by PROXY_API_KEYS and managed keys
// alike, and applies their limits; *access.Gate implements it.
type ClientGate interface {
	Authenticate(authorization []byte) (access.Caller, error)
	Admit(ctx context.Context, c access.Caller, r access.Request) (*access.Ticket, error)
	CostMicros(model string, u models.TokenUsage) int64
}

// admitLimits takes the caller's RPM, TPM and budget before forwarding
// (keyed replays never get here); a refusal carries its headers.
func (p *Proxy) admitLimits(c *fiber.Ctx, ex *exchange) error {
	t, err := p.gate.Admit(c.UserContext(), ex.caller, ex.ask)
	ex.ticket = t
	return LimitRefusal(c, err)
}

// LimitRefusal sets the Retry-After and x-ratelimit-* headers of a refusal
// by the gate's Admit and returns the error to answer in OpenAI's shape;
// nil stays nil. The WebSocket proxy uses it before upgrading.
func LimitRefusal(c *fiber.Ctx, err error) error {
	var r *access.Refusal
	if errors.As(err, &r) {
		for _, h := range r.RateLimitHead {
			c.Set(h.Name, h.Value)
		}
		if r.RetryAfter > 0 {
			c.Set(fiber.HeaderRetryAfter, strconv.FormatInt(int64((r.RetryAfter+time.Second-1)/time.Second), 10))
		}
	}
	return refusalError(err)
}

// setRateLimitHeaders shows the proxy's own limits in place of upstream's
// (which describe the upstream account, not this key).
func (ex *exchange) setRateLimitHeaders(h *fasthttp.ResponseHeader) {
	kvs := ex.ticket.Headers()
	if len(kvs) == 0 {
		return
	}
	for _, name := range rateLimitHeaders {
		h.Del(name)
	}
	for _, kv := range kvs {
		h.Set(kv.Name, kv.Value)
	}
}

var rateLimitHeaders = []string{
	"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
	"x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
}

// keyError is the answer to a failed authentication.
func keyError(err error) error {
	var r *access.Refusal
	switch {
	case errors.Is(err, errNoKey):
		return errMissingKey
	case errors.As(err, &r):
		return refusalError(err) // revoked or expired: say which
	}
	return errInvalidKey
}

// refusalError turns an access refusal into the APIError the client sees.
func refusalError(err error) error {
	var r *access.Refusal
	if !errors.As(err, &r) {
		return err
	}
	outcome := models.OutcomeRejected
	if r.Status == http.StatusUnauthorized {
		outcome = models.OutcomeUnauthorized
	}
	return &APIError{Status: r.Status, Type: r.Type, Code: r.Code, Message: r.Message, Outcome: outcome}
}

// askOf is what limits need to know of a JSON request body.
func askOf(model string, body []byte, size int) access.Request {
	r := access.Request{Model: model, BodyBytes: int64(size)}
	for _, f := range [...]string{"max_completion_tokens", "max_tokens", "max_output_tokens"} {
		if v := gjson.GetBytes(body, f); v.Exists() {
			r.MaxTokens = v.Int()
			break
		}
	}
	return r
}
