package models_test

import (
	"context"
	"strings"
	"testing"

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
