package app

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/dustin/go-humanize"

	"github.com/openai-idempotent-proxy/proxy/handlers"
	"github.com/openai-idempotent-proxy/proxy/models"
)

// Config is the whole runtime configuration, read once from the environment
// at start and passed down as a value.
type Config struct {
	ListenAddr string // LISTEN_ADDR, default ":8080"

	UpstreamAPIKey   string          // OPENAI_API_KEY, required; never logged or shown
	UpstreamBaseURL  *url.URL        // UPSTREAM_BASE_URL, default https://api.openai.com/v1
	UpstreamCAs      *x509.CertPool  // UPSTREAM_CA_FILE: extra CA certificates (PEM) trusted for the upstream
	UpstreamTimeout  time.Duration   // UPSTREAM_TIMEOUT, default 30m: upper bound on one upstream call
	FirstByteTimeout time.Duration   // UPSTREAM_FIRST_BYTE_TIMEOUT, default 10m: silence before the response starts
	IdleTimeout      time.Duration   // UPSTREAM_IDLE_TIMEOUT, default 5m: silence in the middle of a response
	Egress           handlers.Egress // HTTPS_PROXY, HTTP_PROXY, NO_PROXY (or their lower-case forms)

	WSMaxMessageSize int64         // WS_MAX_MESSAGE_SIZE, default 16MiB: largest WebSocket message either way
	WSIdleTimeout    time.Duration // WS_IDLE_TIMEOUT, default 5m: a WebSocket session with no frame either way is closed

	ClientKeys     []handlers.ClientKey // PROXY_API_KEYS, "key" or "name:key", comma-separated
	AllowOpenProxy bool                 // ALLOW_OPEN_PROXY, default false

	DatabaseURL string // DATABASE_URL; empty selects SQLite under DataDir
	DataDir     string // DATA_DIR, default "./data"

	CORSAllowedOrigins []string // CORS_ALLOWED_ORIGINS, default none

	MaxBodySize          int64         // MAX_BODY_SIZE, default 512 MiB
	RequestHeaderTimeout time.Duration // REQUEST_HEADER_TIMEOUT, default 10s: first byte to end of headers
	RequestReadTimeout   time.Duration // REQUEST_READ_TIMEOUT, default 10m: end of headers to end of body
	ShutdownGrace        time.Duration // SHUTDOWN_GRACE, default 30s
	TrustedProxies       []string      // TRUSTED_PROXIES: reverse proxies whose X-Forwarded-For is believed

	IdempotencyTTL      time.Duration // IDEMPOTENCY_TTL, default 24h
	IdempotencyLease    time.Duration // IDEMPOTENCY_LEASE, default 30s
	IdempotencyJoinWait time.Duration // IDEMPOTENCY_JOIN_WAIT, default 10m; 0: a repeat of a running key gets 409
	IdempotencyMaxBody  int64         // IDEMPOTENCY_MAX_BODY, default 8 MiB: largest response stored for replay
	BufferMemoryLimit   int64         // BUFFER_MEMORY_LIMIT, default 256 MiB: bytes held for captures, replays and inspected bodies

	LogRetention time.Duration // LOG_RETENTION, default 30d
	LogQueueSize int           // LOG_QUEUE_SIZE, default 10000

	AdminPassword string // ADMIN_PASSWORD; empty disables the dashboard
	MetricsToken  string // METRICS_TOKEN; empty leaves /metrics open
	AdminAPIToken string // ADMIN_API_TOKEN; empty disables /admin/v1

	Prices        *models.Prices // PRICE_FILE over the embedded price table
	ReserveTokens int64          // BUDGET_RESERVE_TOKENS, default 4096
	// StreamUsageOff: STREAM_USAGE=off (default inject) forwards streamed
	// chat completions without asking upstream for their usage.
	StreamUsageOff bool

	LogLevel  string // LOG_LEVEL: debug, info, warn, error (default info)
	LogFormat string // LOG_FORMAT: text or json (default text)
}

// Setting describes one environment variable the proxy reads.
type Setting struct {
	Name    string
	Default string
	Help    string
	parse   func(c *Config, v string) error
}

// Settings lists every environment variable the proxy reads, in the order the
// README and .env.example present them. It is the single source of truth for
// configuration: LoadConfig reads exactly these.
func Settings() []Setting { return settings }

var settings = []Setting{
	{"LISTEN_ADDR", ":8080", "address the proxy listens on", func(c *Config, v string) error {
		if err := checkListenAddr(v); err != nil {
			return err
		}
		c.ListenAddr = v
		return nil
	}},
	{"OPENAI_API_KEY", "", "upstream API key (required); sent upstream, never shown", func(c *Config, v string) error {
		if v == "" {
			return errRequired
		}
		if err := checkSecret(v, minTokenLen); err != nil {
			return err
		}
		c.UpstreamAPIKey = v
		return nil
	}},
	{"UPSTREAM_BASE_URL", "https://api.openai.com/v1", "OpenAI-compatible base URL, with its own path prefix", func(c *Config, v string) error {
		u, err := url.Parse(strings.TrimRight(v, "/"))
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return errors.New("want an absolute http(s) URL")
		}
		if u.RawQuery != "" || u.Fragment != "" {
			return errors.New("must not carry a query or fragment")
		}
		c.UpstreamBaseURL = u
		return nil
	}},
	{"UPSTREAM_CA_FILE", "", "PEM file of extra CA certificates to trust for an https upstream (e.g. a private CA)", func(c *Config, v string) error {
		if v == "" {
			return nil
		}
		pem, err := os.ReadFile(v)
		if err != nil {
			return fmt.Errorf("cannot read: %w", err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return errors.New("holds no PEM certificate")
		}
		c.UpstreamCAs = pool
		return nil
	}},
	{"HTTPS_PROXY", "", "outbound proxy for an https upstream (HTTP CONNECT or socks5), also read as https_proxy", proxySetting(func(c *Config) *string { return &c.Egress.Proxy.HTTPSProxy })},
	{"HTTP_PROXY", "", "outbound proxy for an http upstream, also read as http_proxy", proxySetting(func(c *Config) *string { return &c.Egress.Proxy.HTTPProxy })},
	{"NO_PROXY", "", "upstream hosts reached directly, comma-separated (hosts, domains, IPs, CIDRs, *), also read as no_proxy", func(c *Config, v string) error {
		c.Egress.Proxy.NoProxy = v
		return nil
	}},
	{"PROXY_API_KEYS", "", "client keys, comma-separated, each \"key\" or \"name:key\" (required unless ALLOW_OPEN_PROXY=true or keys are managed)", func(c *Config, v string) error {
		keys, err := handlers.ParseClientKeys(v)
		if err != nil {
			return err
		}
		for i, k := range keys {
			if err := checkSecret(k.Key, minTokenLen); err != nil {
				return fmt.Errorf("key %d (%s): %w", i+1, k.Name, err)
			}
		}
		c.ClientKeys = keys
		return nil
	}},
	{"ALLOW_OPEN_PROXY", "false", "true runs without client keys: anyone who reaches the port spends your key", boolSetting(func(c *Config) *bool { return &c.AllowOpenProxy })},
	{"DATABASE_URL", "", "postgres://… selects PostgreSQL; empty selects SQLite in DATA_DIR", func(c *Config, v string) error {
		if v != "" && !strings.HasPrefix(v, "postgres://") && !strings.HasPrefix(v, "postgresql://") {
			return errors.New("want a postgres:// URL, or empty for the embedded SQLite")
		}
		c.DatabaseURL = v
		return nil
	}},
	{"DATA_DIR", "./data", "directory of the embedded SQLite database", func(c *Config, v string) error {
		if v == "" {
			return errors.New("must not be empty")
		}
		c.DataDir = v
		return nil
	}},
	{"CORS_ALLOWED_ORIGINS", "", "browser origins allowed to call /v1, comma-separated, or *; empty allows none", func(c *Config, v string) error {
		origins := splitList(v)
		for _, o := range origins {
			if o == "*" {
				continue
			}
			u, err := url.Parse(o)
			if err != nil || u.Scheme == "" || u.Host == "" || (u.Path != "" && u.Path != "/") {
				return fmt.Errorf("%q is not an origin like https://app.example.com", o)
			}
		}
		c.CORSAllowedOrigins = origins
		return nil
	}},
	{"UPSTREAM_TIMEOUT", "30m", "upper bound on one upstream call, streams included", durationSetting(func(c *Config) *time.Duration { return &c.UpstreamTimeout })},
	{"UPSTREAM_FIRST_BYTE_TIMEOUT", "10m", "how long upstream may stay silent before its response starts", durationSetting(func(c *Config) *time.Duration { return &c.FirstByteTimeout })},
	{"UPSTREAM_IDLE_TIMEOUT", "5m", "how long upstream may stay silent in the middle of a response", durationSetting(func(c *Config) *time.Duration { return &c.IdleTimeout })},
	{"WS_MAX_MESSAGE_SIZE", "16MiB", "largest WebSocket message accepted from the client or the upstream (the session closes with 1009 above it)", sizeSetting(func(c *Config) *int64 { return &c.WSMaxMessageSize })},
	{"WS_IDLE_TIMEOUT", "5m", "a WebSocket session with no frame in either direction for this long is closed (1001)", durationSetting(func(c *Config) *time.Duration { return &c.WSIdleTimeout })},
	{"MAX_BODY_SIZE", "512MiB", "largest request body accepted (413 above it)", sizeSetting(func(c *Config) *int64 { return &c.MaxBodySize })},
	{"REQUEST_HEADER_TIMEOUT", "10s", "how long a client may take to send a request's headers, on a new or a kept-alive connection", durationSetting(func(c *Config) *time.Duration { return &c.RequestHeaderTimeout })},
	{"REQUEST_READ_TIMEOUT", "10m", "upper bound on receiving one client request's body, upload included", durationSetting(func(c *Config) *time.Duration { return &c.RequestReadTimeout })},
	{"SHUTDOWN_GRACE", "30s", "how long in-flight requests may finish after SIGTERM", durationSetting(func(c *Config) *time.Duration { return &c.ShutdownGrace })},
	{"TRUSTED_PROXIES", "", "reverse-proxy IPs or CIDRs whose X-Forwarded-For gives the client IP", func(c *Config, v string) error {
		for _, p := range splitList(v) {
			if net.ParseIP(p) == nil {
				if _, _, err := net.ParseCIDR(p); err != nil {
					return fmt.Errorf("%q is not an IP address or CIDR", p)
				}
			}
		}
		c.TrustedProxies = splitList(v)
		return nil
	}},
	{"IDEMPOTENCY_TTL", "24h", "how long a completed Idempotency-Key is replayed", durationSetting(func(c *Config) *time.Duration { return &c.IdempotencyTTL })},
	{"IDEMPOTENCY_LEASE", "30s", "how long a crashed holder keeps a key in progress before another replica takes it over", durationSetting(func(c *Config) *time.Duration { return &c.IdempotencyLease })},
	{"IDEMPOTENCY_JOIN_WAIT", "10m", "how long a repeat of a still-running keyed request waits for its answer (streams are followed while they run); 0 answers 409 at once", func(c *Config, v string) error {
		d, err := parseDuration(v)
		if err != nil || d < 0 {
			return errors.New("must be a duration, 0 or more")
		}
		c.IdempotencyJoinWait = d
		return nil
	}},
	{"IDEMPOTENCY_MAX_BODY", "8MiB", "largest response stored for replay (larger ones answer retries with 410)", sizeSetting(func(c *Config) *int64 { return &c.IdempotencyMaxBody })},
	{"BUFFER_MEMORY_LIMIT", "256MiB", "total memory held for idempotency captures, replays and inspected request bodies; past it new keyed requests wait, then get 503", sizeSetting(func(c *Config) *int64 { return &c.BufferMemoryLimit })},
	{"LOG_RETENTION", "30d", "how long request log rows are kept", durationSetting(func(c *Config) *time.Duration { return &c.LogRetention })},
	{"LOG_QUEUE_SIZE", "10000", "request log records buffered in memory before new ones are dropped", func(c *Config, v string) error {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return errors.New("want a positive whole number")
		}
		c.LogQueueSize = n
		return nil
	}},
	{"ADMIN_PASSWORD", "", "enables the dashboard at /dashboard with this password", func(c *Config, v string) error {
		if v != "" {
			if err := checkSecret(v, minPasswordLen); err != nil {
				return err
			}
		}
		c.AdminPassword = v
		return nil
	}},
	{"METRICS_TOKEN", "", "bearer token required by /metrics; empty leaves it open", func(c *Config, v string) error {
		if v != "" {
			if err := checkSecret(v, minTokenLen); err != nil {
				return err
			}
		}
		c.MetricsToken = v
		return nil
	}},
	{"ADMIN_API_TOKEN", "", "enables the admin API at /admin/v1 (managing client keys) with this bearer token", func(c *Config, v string) error {
		if v != "" {
			if err := checkSecret(v, minAdminTokenLen); err != nil {
				return err
			}
		}
		c.AdminAPIToken = v
		return nil
	}},
	{"PRICE_FILE", "", "JSON price table whose models add to or replace the embedded one (USD per 1M tokens)", func(c *Config, v string) error {
		p, err := models.LoadPrices(v)
		if err != nil {
			return err
		}
		c.Prices = p
		return nil
	}},
	{"BUDGET_RESERVE_TOKENS", "4096", "output tokens a budgeted request reserves when it names no max_tokens", func(c *Config, v string) error {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 || n > 10_000_000 {
			return errors.New("want a whole number of tokens from 0 to 10000000")
		}
		c.ReserveTokens = n
		return nil
	}},
	{"STREAM_USAGE", "inject", "inject: ask upstream for the usage of streamed chat completions and hide it from clients that did not ask; off: forward them as sent (unpriced unless the client asks)", func(c *Config, v string) error {
		switch strings.ToLower(v) {
		case "inject", "off":
			c.StreamUsageOff = strings.ToLower(v) == "off"
			return nil
		}
		return errors.New("want inject or off")
	}},
	{"LOG_LEVEL", "info", "debug, info, warn or error", func(c *Config, v string) error {
		switch strings.ToLower(v) {
		case "debug", "info", "warn", "error":
			c.LogLevel = strings.ToLower(v)
			return nil
		}
		return errors.New("want debug, info, warn or error")
	}},
	{"LOG_FORMAT", "text", "text or json", func(c *Config, v string) error {
		switch strings.ToLower(v) {
		case "text", "json":
			c.LogFormat = strings.ToLower(v)
			return nil
		}
		return errors.New("want text or json")
	}},
}

// LoadConfig reads every setting through getenv, applies defaults, and
// returns all problems at once, each naming its variable.
func LoadConfig(getenv func(string) string) (Config, error) {
	var c Config
	var errs []error
	set := map[string]bool{}
	for _, s := range settings {
		v := strings.TrimSpace(getenv(s.Name))
		if v == "" && lowerCaseToo[s.Name] {
			v = strings.TrimSpace(getenv(strings.ToLower(s.Name)))
		}
		set[s.Name] = v != ""
		if v == "" {
			v = s.Default
		}
		if err := s.parse(&c, v); err != nil {
			errs = append(errs, settingError(s.Name, v, err))
		}
	}
	if len(errs) == 0 {
		errs = append(errs, c.validate(set)...)
	}
	if len(errs) > 0 {
		return Config{}, fmt.Errorf("invalid configuration: %w", errors.Join(errs...))
	}
	return c, nil
}

// validate checks the rules that span several settings; set names those
// the environment gave.
func (c *Config) validate(set map[string]bool) []error {
	var errs []error
	if len(c.ClientKeys) == 0 && !c.AllowOpenProxy && !c.ManagesKeys() {
		errs = append(errs, errors.New("PROXY_API_KEYS is required: set client keys, manage them (ADMIN_PASSWORD or ADMIN_API_TOKEN), or ALLOW_OPEN_PROXY=true to run without them"))
	}
	for _, k := range c.ClientKeys {
		if k.Key == c.UpstreamAPIKey {
			errs = append(errs, errors.New("PROXY_API_KEYS must not contain OPENAI_API_KEY"))
			break
		}
	}
	if c.IdempotencyLease < time.Second {
		errs = append(errs, errors.New("IDEMPOTENCY_LEASE must be at least 1s"))
	}
	if c.BufferMemoryLimit < c.IdempotencyMaxBody {
		errs = append(errs, fmt.Errorf("BUFFER_MEMORY_LIMIT (%d bytes) must be at least IDEMPOTENCY_MAX_BODY (%d bytes): no response could be stored whole", c.BufferMemoryLimit, c.IdempotencyMaxBody))
	}
	if c.FirstByteTimeout > c.UpstreamTimeout && !set["UPSTREAM_FIRST_BYTE_TIMEOUT"] {
		c.FirstByteTimeout = c.UpstreamTimeout // the default gives way to a shorter whole-call bound
	}
	if c.FirstByteTimeout > c.UpstreamTimeout {
		errs = append(errs, fmt.Errorf("UPSTREAM_FIRST_BYTE_TIMEOUT (%s) must not exceed UPSTREAM_TIMEOUT (%s), the bound on the whole call", c.FirstByteTimeout, c.UpstreamTimeout))
	}
	return errs
}

// ManagesKeys reports whether client keys can be created at run time, on
// the dashboard or through the admin API.
func (c *Config) ManagesKeys() bool { return c.AdminPassword != "" || c.AdminAPIToken != "" }

// OpenProxy reports whether requests pass without any client key.
func (c *Config) OpenProxy() bool { return c.AllowOpenProxy && len(c.ClientKeys) == 0 }

// lowerCaseToo names the settings also read in lower case when the upper
// case is unset, as curl and Go's net/http read them.
var lowerCaseToo = map[string]bool{"HTTPS_PROXY": true, "HTTP_PROXY": true, "NO_PROXY": true}

// proxySetting reads an outbound proxy URL the way Go's httpproxy does (a
// bare "host:port" means http://host:port) and refuses what the dialer
// cannot use, at start rather than on every upstream call.
func proxySetting(field func(*Config) *string) func(*Config, string) error {
	return func(c *Config, v string) error {
		if v == "" {
			return nil
		}
		u, err := url.Parse(v)
		if err != nil || u.Scheme == "" || u.Host == "" {
			u, err = url.Parse("http://" + v)
		}
		if err != nil || u.Host == "" {
			return errors.New("want a proxy URL such as http://proxy.internal:3128")
		}
		switch u.Scheme {
		case "http", "socks5", "socks5h":
		default:
			return fmt.Errorf("scheme %q is not supported: use http:// (CONNECT) or socks5://", u.Scheme)
		}
		*field(c) = v
		return nil
	}
}

// errRequired is a required setting left unset.
var errRequired = errors.New("required, not set")

// settingError names the variable and, unless it is secret or unset, the
// value that was refused.
func settingError(name, v string, err error) error {
	switch {
	case v == "":
		return fmt.Errorf("%s: %w", name, err)
	case isSecret(name):
		return fmt.Errorf("%s (value not shown): %w", name, err)
	}
	return fmt.Errorf("%s=%q: %w", name, v, err)
}

// Secrets are redacted wherever they occur in log text, so a short one
// would mangle every line that happens to contain it, and reveal itself
// by the pattern. Tokens and keys are generated, so they can be long; the
// admin password is typed by a person.
const (
	minTokenLen    = 16
	minPasswordLen = 12
	// The admin API can create keys that spend the upstream account, and
	// is meant for automation: its token can be long.
	minAdminTokenLen = 32
)

// checkSecret refuses a secret too short to be one, and the README's
// "sk-..." placeholder (or any value with an ellipsis) copied as-is.
func checkSecret(v string, minLen int) error {
	if strings.Contains(v, "...") || strings.Contains(v, "…") {
		return errors.New("is a placeholder (it contains \"...\"): set the real value")
	}
	if n := utf8.RuneCountInString(v); n < minLen {
		return fmt.Errorf("must be at least %d characters (got %d)", minLen, n)
	}
	return nil
}

// checkListenAddr refuses what net.Listen would refuse later: no port, a
// port out of range, or a host that is neither an IP nor a host name.
func checkListenAddr(v string) error {
	host, port, err := net.SplitHostPort(v)
	if err != nil {
		return errors.New("want host:port, e.g. :8080 or 127.0.0.1:8080")
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return errors.New("the port must be a number from 1 to 65535")
	}
	ip, _, _ := strings.Cut(host, "%") // an IPv6 zone, as in [fe80::1%eth0]
	if host != "" && net.ParseIP(ip) == nil && !validHostname(host) {
		return fmt.Errorf("%q is neither an IP address nor a host name", host)
	}
	return nil
}

func validHostname(h string) bool {
	if len(h) > 253 {
		return false
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return false
			}
		}
	}
	return true
}

// Secrets returns every secret value in the configuration, for redaction.
func (c *Config) Secrets() []string {
	s := []string{c.UpstreamAPIKey}
	for _, k := range c.ClientKeys {
		s = append(s, k.Key)
	}
	if c.AdminPassword != "" {
		s = append(s, c.AdminPassword)
	}
	if c.MetricsToken != "" {
		s = append(s, c.MetricsToken)
	}
	if c.AdminAPIToken != "" {
		s = append(s, c.AdminAPIToken)
	}
	return s
}

func isSecret(name string) bool {
	switch name {
	case "OPENAI_API_KEY", "PROXY_API_KEYS", "ADMIN_PASSWORD", "METRICS_TOKEN", "ADMIN_API_TOKEN", "DATABASE_URL", "HTTPS_PROXY", "HTTP_PROXY":
		return true
	}
	return false
}

func splitList(v string) []string {
	var out []string
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func boolSetting(field func(*Config) *bool) func(*Config, string) error {
	return func(c *Config, v string) error {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return errors.New("want true or false")
		}
		*field(c) = b
		return nil
	}
}

func durationSetting(field func(*Config) *time.Duration) func(*Config, string) error {
	return func(c *Config, v string) error {
		d, err := parseDuration(v)
		if err != nil {
			return err
		}
		if d <= 0 {
			return errors.New("must be positive")
		}
		*field(c) = d
		return nil
	}
}

func sizeSetting(field func(*Config) *int64) func(*Config, string) error {
	return func(c *Config, v string) error {
		n, err := humanize.ParseBytes(v)
		if err != nil || n == 0 || n > 1<<40 {
			return errors.New("want a size such as 512MiB or 10MB")
		}
		*field(c) = int64(n)
		return nil
	}
}

// parseDuration accepts Go durations plus a whole-day suffix ("30d"), since
// retention periods are naturally counted in days.
func parseDuration(v string) (time.Duration, error) {
	if days, ok := strings.CutSuffix(v, "d"); ok {
		n, err := strconv.Atoi(days)
		if err != nil || n < 0 {
			return 0, errors.New("want a duration such as 30s, 5m, 24h or 30d")
		}
		return time.Duration(n) * 24 * time.Hour, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0, errors.New("want a duration such as 30s, 5m, 24h or 30d")
	}
	return d, nil
}
