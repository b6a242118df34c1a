package models_test

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/openai-idempotent-proxy/proxy/models"
	"github.com/openai-idempotent-proxy/proxy/models/testdb"
)

// TestOlderBinaryRefusesNewerSchema: a database migrated by a newer release
// is never served by an older binary, which would misread it.
func TestOlderBinaryRefusesNewerSchema(t *testing.T) {
	url := testdb.PostgresURL(t)
	s, err := models.Open(context.Background(), models.Options{DatabaseURL: url})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DB().Exec("INSERT INTO goose_db_version (version_id, is_applied) VALUES (999, true)").Error; err != nil {
		t.Fatal(err)
	}
	s.Close()
	_, err = models.Open(context.Background(), models.Options{DatabaseURL: url})
	if err == nil || !strings.Contains(err.Error(), "newer release") {
		t.Fatalf("opened a schema at version 999: %v", err)
	}
}

// TestMigrationsAreIdempotent: opening an up-to-date database applies nothing.
func TestMigrationsAreIdempotent(t *testing.T) {
	dir := t.TempDir()
	var counts []int64
	for i := 0; i < 2; i++ {
		s, err := models.Open(context.Background(), models.Options{DataDir: dir})
		if err != nil {
			t.Fatalf("open %d: %v", i, err)
		}
		var n int64
		s.DB().Table("goose_db_version").Where("version_id > 0").Count(&n)
		counts = append(counts, n)
		s.Close()
	}
	if counts[0] == 0 || counts[1] != counts[0] {
		t.Fatalf("migrations recorded per open: %v", counts)
	}
}

// A database host that accepts connections and never answers fails the
// start within the connect timeout instead of hanging it.
func TestOpenGivesUpOnASilentDatabase(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			defer conn.Close() // held open, never answered
		}
	}()
	done := make(chan error, 1)
	go func() {
		_, err := models.Open(context.Background(), models.Options{DatabaseURL: "postgres://nobody@" + ln.Addr().String() + "/x?sslmode=disable", ConnectTimeout: time.Second})
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("opened a database that never answered")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Open still waiting after 20 s for a silent database")
	}
}
