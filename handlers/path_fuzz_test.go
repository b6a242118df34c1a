package handlers

import (
	"net/url"
	"path"
	"strings"
	"testing"
)

// FuzzNormalisePath: whatever the input, an accepted path is clean, stays
// under /v1/, and joins onto the upstream base without escaping it.
func FuzzNormalisePath(f *testing.F) {
	for _, s := range []string{"/v1/chat/completions", "/v1/../dashboard", "/v1/%2e%2e/x", "/v1//a/./b/../c", "/v1/%00", "/v1/a%2fb", "/v1/%zz", "/v1", "/v1/a/", "/v1/a/.", "/v1/a/..", "v1/a"} {
		f.Add(s)
	}
	base, _ := url.Parse("https://api.example.com/api/v1")
	f.Fuzz(func(t *testing.T, raw string) {
		p, apiErr := NormalisePath(raw)
		if apiErr != nil {
			return
		}
		// Clean leaves no "//", "/./", "/../" or trailing "/..".
		if path.Clean(p) != p || !strings.HasPrefix(p, "/v1/") {
			t.Fatalf("NormalisePath(%q) = %q", raw, p)
		}
		u, err := url.Parse(UpstreamURL(base, p, nil))
		if err != nil || u.Host != "api.example.com" || !strings.HasPrefix(u.Path, "/api/v1/") || strings.Contains(u.Path, "/../") {
			t.Fatalf("%q reached %v (%v)", raw, u, err)
		}
	})
}
