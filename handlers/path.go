package handlers

import (
	"net/url"
	"path"
	"strings"
)

// NormalisePath turns the raw request path into the /v1 path to forward, or
// fails. Dot-segments are resolved after percent-decoding, so
// "/v1/../dashboard" and "/v1/%2e%2e/dashboard" can never reach another
// upstream path; encoded slashes and backslashes are refused outright since
// no OpenAI path contains them and they mean different things to different
// servers. The result always starts with "/v1/".
func NormalisePath(raw string) (string, *APIError) {
	lower := strings.ToLower(raw)
	if strings.Contains(lower, "%2f") || strings.Contains(lower, "%5c") || strings.Contains(raw, `\`) {
		return "", errBadPath
	}
	decoded, err := url.PathUnescape(raw)
	if err != nil {
		return "", errBadPath
	}
	for i := 0; i < len(decoded); i++ {
		if c := decoded[i]; c < 0x20 || c == 0x7f {
			return "", errBadPath
		}
	}
	cleaned := decoded
	if !isClean(decoded) { // most paths are: they skip Clean's copies
		cleaned = path.Clean("/" + decoded)
	}
	if !strings.HasPrefix(cleaned, "/v1/") {
		return "", errUnknownRoute
	}
	return cleaned, nil
}

// UpstreamURL joins the base URL (with its own path prefix) and the part of
// the normalised path after /v1, re-escaping it, plus the raw query. The HTTP
// and the WebSocket proxy both read paths and build upstream URLs this way.
func UpstreamURL(base *url.URL, normalised string, rawQuery []byte) string {
	u := *base
	u.Path = strings.TrimRight(base.Path, "/") + strings.TrimPrefix(normalised, "/v1")
	u.RawPath = ""
	u.RawQuery = string(rawQuery)
	return u.String()
}

// isClean reports whether p is rooted and already what path.Clean makes of
// it: no empty, "." or ".." segment, no trailing slash.
func isClean(p string) bool {
	if p == "/" {
		return true
	}
	if !strings.HasPrefix(p, "/") {
		return false
	}
	for seg := range strings.SplitSeq(p[1:], "/") {
		if seg == "" || seg == "." || seg == ".." {
			return false
		}
	}
	return true
}
