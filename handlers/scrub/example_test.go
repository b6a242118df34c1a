package scrub_test

import (
	"bytes"
	"fmt"
	"io"
	"os"

	"github.com/klauspost/compress/gzip"
	"github.com/openai-idempotent-proxy/proxy/handlers/scrub"
)

// An echoing upstream answers with a gzip-compressed SSE stream that quotes
// the key: decode it, then mask it, and serve it without Content-Encoding.
func Example() {
	m := scrub.New("sk-upstream-0123456789", "client-key-abcdefgh")

	var gz bytes.Buffer
	w := gzip.NewWriter(&gz)
	io.WriteString(w, "data: {\"echo\":\"Bearer sk-upstream-0123456789\"}\n\n")
	w.Close()

	body, err := scrub.Decode("gzip", &gz, 32<<20)
	if err != nil {
		panic(err) // only an unknown Content-Encoding
	}
	defer body.Close()
	io.Copy(os.Stdout, m.Reader(body))

	fmt.Println(m.String("Authorization: Bearer client-key-abcdefgh"))
	// Output:
	// data: {"echo":"Bearer **********************"}
	//
	// Authorization: Bearer *******************
}
