package proxy

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"hash"
	"io"
	"mime"
	"mime/multipart"
	"net/textproto"
	"os"
	"slices"
	"strings"

	"github.com/gofiber/fiber/v2"
	"github.com/valyala/fasthttp"
)

// Pure parsing for Idempotency-Key handling: the key, its scope, and the
// fingerprint of the request it was sent with.

// parseIdempotencyKey accepts the draft's Structured Field string ("abc")
// and the bare form Stripe and the SDKs send (abc) as the same key: 1–255
// printable ASCII characters, in exactly one header.
func parseIdempotencyKey(values [][]byte) (string, bool) {
	if len(values) != 1 {
		return "", false
	}
	v := bytes.TrimSpace(values[0])
	if len(v) > 0 && v[0] == '"' {
		// A Structured Field string: it must be closed, with only \" and
		// \\ as escapes.
		if len(v) < 2 || v[len(v)-1] != '"' {
			return "", false
		}
		var out []byte
		inner := v[1 : len(v)-1]
		for i := 0; i < len(inner); i++ {
			ch := inner[i]
			switch {
			case ch == '\\':
				if i+1 >= len(inner) || (inner[i+1] != '"' && inner[i+1] != '\\') {
					return "", false
				}
				i++
				out = append(out, inner[i])
			case ch == '"':
				return "", false
			default:
				out = append(out, ch)
			}
		}
		v = out
	}
	if len(v) == 0 || len(v) > 255 {
		return "", false
	}
	for _, ch := range v {
		if ch < 0x20 || ch > 0x7e {
			return "", false
		}
	}
	return string(v), true
}

// scopeID names a key within its client's scope: two clients using the same
// key never share a record. Method and path are part of the fingerprint
// instead, so reusing a key on another endpoint is a 422, as with Stripe,
// rather than a silent second execution.
func scopeID(client, key string) string {
	h := sha256.New()
	for _, s := range []string{client, key} {
		h.Write([]byte(s))
		h.Write([]byte{0})
	}
	var sum [sha256.Size]byte
	return hexString(h.Sum(sum[:0]))
}

// hexString is b in hex with one allocation, the string, where
// hex.EncodeToString makes two: ids and fingerprints are made on every
// keyed request.
func hexString(b []byte) string {
	var out [2 * sha256.Size]byte
	return string(hex.AppendEncode(out[:0], b))
}

func randomToken() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hexString(b[:])
}

// spoolMemory is how much of a streamed keyed body is held in memory before
// it spills to a temporary file.
const spoolMemory = 8 << 20

// requestFingerprint hashes method, path, query and body. A streamed body
// is spooled (memory, then a temporary file) so it can be hashed and still
// be sent upstream; cleanup removes the spool once the request is done.
func requestFingerprint(c *fiber.Ctx, path string) (string, func(), error) {
	cleanup := func() {}
	req := c.Request()
	var body io.ReadSeeker
	if req.IsBodyStream() {
		spool, size, done, err := spoolBody(req.BodyStream())
		if err != nil {
			done()
			return "", cleanup, err
		}
		cleanup = done
		req.SetBodyStream(spool, int(size))
		body = spool
	} else {
		body = bytes.NewReader(req.Body())
	}
	h := sha256.New()
	for _, s := range []string{string(req.Header.Method()), path, string(req.URI().QueryString())} {
		h.Write([]byte(s))
		h.Write([]byte{0})
	}
	if err := hashBody(h, string(req.Header.ContentType()), body); err != nil {
		return "", cleanup, err
	}
	if _, err := body.Seek(0, io.SeekStart); err != nil {
		return "", cleanup, err
	}
	var sum [sha256.Size]byte
	return hexString(h.Sum(sum[:0])), cleanup, nil
}

// hashBody writes the body's identity into h. For multipart/form-data the
// parsed parts are hashed (name, filename, content type, content digest),
// not the raw bytes: SDKs pick a new random boundary on every retry.
func hashBody(h hash.Hash, contentType string, body io.ReadSeeker) error {
	mt, params, _ := mime.ParseMediaType(contentType)
	if mt == "multipart/form-data" && params["boundary"] != "" {
		if sum, err := multipartDigest(body, params["boundary"]); err == nil {
			h.Write([]byte("multipart\x00"))
			h.Write(sum)
			return nil
		}
		if _, err := body.Seek(0, io.SeekStart); err != nil {
			return err
		}
	}
	h.Write([]byte("raw\x00"))
	_, err := io.Copy(h, body)
	return err
}

func multipartDigest(body io.Reader, boundary string) ([]byte, error) {
	h := sha256.New()
	mr := multipart.NewReader(body, boundary)
	for {
		part, err := mr.NextRawPart()
		if errors.Is(err, io.EOF) {
			return h.Sum(nil), nil
		}
		if err != nil {
			return nil, err
		}
		content := sha256.New()
		if _, err := io.Copy(content, part); err != nil {
			return nil, err
		}
		for _, s := range []string{part.FormName(), part.FileName(), partHeaders(part.Header)} {
			h.Write([]byte(s))
			h.Write([]byte{0})
		}
		h.Write(content.Sum(nil))
	}
}

// partHeaders renders a part's headers in a canonical order. Every part
// header counts (Content-Type, Content-Transfer-Encoding, …): each can
// change what the part means, and none varies between retries of one
// request; what SDKs do vary, the boundary, is in the request's
// Content-Type, not here. Content-Disposition is compared parsed, so
// quoting differences between encoders do not make another request.
func partHeaders(hdr textproto.MIMEHeader) string {
	keys := make([]string, 0, len(hdr))
	for k := range hdr {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	for _, k := range keys {
		for _, v := range hdr[k] {
			v = strings.TrimSpace(v)
			if k == "Content-Disposition" {
				if d, params, err := mime.ParseMediaType(v); err == nil {
					if f := mime.FormatMediaType(d, params); f != "" {
						v = f
					}
				}
			}
			b.WriteString(k + ": " + v + "\n")
		}
	}
	return b.String()
}

// spoolBody copies a request body stream into memory, spilling to a
// temporary file past spoolMemory.
func spoolBody(r io.Reader) (io.ReadSeeker, int64, func(), error) {
	var buf bytes.Buffer
	n, err := io.Copy(&buf, io.LimitReader(r, spoolMemory+1))
	if err != nil {
		return nil, 0, func() {}, err
	}
	if n <= spoolMemory {
		return bytes.NewReader(buf.Bytes()), n, func() {}, nil
	}
	f, err := os.CreateTemp("", "proxy-body-*")
	if err != nil {
		return nil, 0, func() {}, err
	}
	done := func() { _ = f.Close(); _ = os.Remove(f.Name()) }
	if _, err := f.Write(buf.Bytes()); err != nil {
		return nil, 0, done, err
	}
	rest, err := io.Copy(f, r)
	if err != nil {
		return nil, 0, done, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, 0, done, err
	}
	// Hide Close: fasthttp closes a body stream that is an io.Closer when
	// the request is reset; the file is closed and removed by done.
	return struct{ io.ReadSeeker }{f}, n + rest, done, nil
}

// appendIdempotencyKeyFields appends to out every Idempotency-Key field as
// received, empty ones included (an empty key is invalid, not absent). It
// reads the raw header block, because parsed headers drop empty values.
// Callers pass an array's slice: one field is valid, so two is room enough.
func appendIdempotencyKeyFields(out [][]byte, h *fasthttp.RequestHeader) [][]byte {
	for line := range bytes.Lines(h.RawHeaders()) {
		name, value, ok := bytes.Cut(bytes.TrimRight(line, "\r\n"), []byte(":"))
		if ok && bytes.EqualFold(bytes.TrimSpace(name), []byte("Idempotency-Key")) {
			out = append(out, bytes.TrimSpace(value))
		}
	}
	return out
}
