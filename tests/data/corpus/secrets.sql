CREATE TABLE credentials (label TEXT, username TEXT, password TEXT);
INSERT INTO credentials VALUES ('provider', 'relay@example.org', 'corpus-sqlite-password');
