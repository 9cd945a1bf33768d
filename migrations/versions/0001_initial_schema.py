"""Initial schema: every table of DESIGN §3.

The tables mirror bulksend/models.py; tests/test_db.py checks that they agree.

Revision ID: 0001
Revises:
Create Date: 2026-11-28 00:38:23.406063
"""

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('account_state',
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('state', sa.String(length=20), server_default='active', nullable=False),
    sa.Column('until', sa.Double(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('failures', sa.Integer(), server_default='0', nullable=False),
    sa.Column('rr_current', sa.Double(), server_default='0', nullable=False),
    sa.Column('sent', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('failed', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('blocked', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('updated_at', sa.Double(), nullable=False),
    sa.CheckConstraint("state IN ('active', 'cooldown', 'disabled', 'exhausted')", name=op.f('ck_account_state_state')),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_account_state'))
    )
    op.create_table('campaigns',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('html_template', sa.Text(), nullable=False),
    sa.Column('text_template', sa.Text(), nullable=True),
    sa.Column('from_address', sa.String(length=500), nullable=True),
    sa.Column('status', sa.String(length=20), server_default='draft', nullable=False),
    sa.Column('send_at', sa.Double(), nullable=True),
    sa.Column('pause_reason', sa.Text(), nullable=True),
    sa.Column('no_dkim', sa.Boolean(), server_default='0', nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.Column('updated_at', sa.Double(), nullable=False),
    sa.Column('started_at', sa.Double(), nullable=True),
    sa.Column('finished_at', sa.Double(), nullable=True),
    sa.CheckConstraint("status IN ('draft', 'scheduled', 'running', 'paused', 'finished', 'cancelled')", name=op.f('ck_campaigns_status')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_campaigns')),
    sa.UniqueConstraint('name', name=op.f('uq_campaigns_name'))
    )
    op.create_table('lists',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_lists')),
    sa.UniqueConstraint('name', name=op.f('uq_lists_name'))
    )
    op.create_table('mailbox_seen',
    sa.Column('mailbox', sa.String(length=500), nullable=False),
    sa.Column('uid', sa.String(length=200), nullable=False),
    sa.Column('processed_at', sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint('mailbox', 'uid', name=op.f('pk_mailbox_seen'))
    )
    op.create_table('subscribers',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('email_key', sa.String(length=320), nullable=False),
    sa.Column('name', sa.String(length=500), server_default='', nullable=False),
    sa.Column('attributes', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.Column('updated_at', sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_subscribers')),
    sa.UniqueConstraint('email_key', name=op.f('uq_subscribers_email_key'))
    )
    op.create_table('campaign_lists',
    sa.Column('campaign_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('list_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.ForeignKeyConstraint(['campaign_id'], ['campaigns.id'], name=op.f('fk_campaign_lists_campaign_id_campaigns'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['list_id'], ['lists.id'], name=op.f('fk_campaign_lists_list_id_lists'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('campaign_id', 'list_id', name=op.f('pk_campaign_lists'))
    )
    op.create_table('deliveries',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('campaign_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('subscriber_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('email_key', sa.String(length=320), nullable=False),
    sa.Column('state', sa.String(length=20), server_default='queued', nullable=False),
    sa.Column('account', sa.String(length=200), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('next_attempt_at', sa.Double(), nullable=False),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_token', sa.String(length=64), nullable=True),
    sa.Column('lease_expires_at', sa.Double(), nullable=True),
    sa.Column('message_id', sa.String(length=500), nullable=True),
    sa.Column('smtp_code', sa.Integer(), nullable=True),
    sa.Column('smtp_enhanced', sa.String(length=20), nullable=True),
    sa.Column('smtp_text', sa.Text(), nullable=True),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.Column('updated_at', sa.Double(), nullable=False),
    sa.Column('sent_at', sa.Double(), nullable=True),
    sa.CheckConstraint("state IN ('queued', 'claimed', 'sending', 'sent', 'failed', 'deferred', 'expired', 'suppressed', 'unknown', 'cancelled')", name=op.f('ck_deliveries_state')),
    sa.ForeignKeyConstraint(['campaign_id'], ['campaigns.id'], name=op.f('fk_deliveries_campaign_id_campaigns'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['subscriber_id'], ['subscribers.id'], name=op.f('fk_deliveries_subscriber_id_subscribers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deliveries')),
    sa.UniqueConstraint('campaign_id', 'subscriber_id', name=op.f('uq_deliveries_campaign_id_subscriber_id'))
    )
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deliveries_campaign_id_state'), ['campaign_id', 'state'], unique=False)
        batch_op.create_index(batch_op.f('ix_deliveries_email_key'), ['email_key'], unique=False)
        batch_op.create_index(batch_op.f('ix_deliveries_lease_expires_at'), ['lease_expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_deliveries_state_next_attempt_at'), ['state', 'next_attempt_at'], unique=False)

    op.create_table('list_members',
    sa.Column('list_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('subscriber_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.Column('updated_at', sa.Double(), nullable=False),
    sa.CheckConstraint("status IN ('subscribed', 'unsubscribed')", name=op.f('ck_list_members_status')),
    sa.ForeignKeyConstraint(['list_id'], ['lists.id'], name=op.f('fk_list_members_list_id_lists'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['subscriber_id'], ['subscribers.id'], name=op.f('fk_list_members_subscriber_id_subscribers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('list_id', 'subscriber_id', name=op.f('pk_list_members'))
    )
    with op.batch_alter_table('list_members', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_list_members_subscriber_id'), ['subscriber_id'], unique=False)

    op.create_table('suppressions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('email_key', sa.String(length=320), nullable=True),
    sa.Column('domain', sa.String(length=255), nullable=True),
    sa.Column('reason', sa.String(length=20), nullable=False),
    sa.Column('source', sa.Text(), server_default='', nullable=False),
    sa.Column('campaign_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.CheckConstraint("reason IN ('unsubscribe', 'hard_bounce', 'complaint', 'manual', 'dead_domain', 'blocklist')", name=op.f('ck_suppressions_reason')),
    sa.CheckConstraint('(email_key IS NULL) <> (domain IS NULL)', name=op.f('ck_suppressions_address_or_domain')),
    sa.ForeignKeyConstraint(['campaign_id'], ['campaigns.id'], name=op.f('fk_suppressions_campaign_id_campaigns'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_suppressions')),
    sa.UniqueConstraint('domain', name=op.f('uq_suppressions_domain')),
    sa.UniqueConstraint('email_key', name=op.f('uq_suppressions_email_key'))
    )
    op.create_table('bounce_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=True),
    sa.Column('diagnostic', sa.Text(), nullable=True),
    sa.Column('source', sa.String(length=20), nullable=False),
    sa.Column('source_key', sa.String(length=500), nullable=False),
    sa.Column('email_key', sa.String(length=320), server_default='', nullable=False),
    sa.Column('delivery_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('campaign_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.CheckConstraint("kind IN ('hard', 'soft', 'complaint', 'unsubscribe', 'block', 'autoreply', 'unknown')", name=op.f('ck_bounce_events_kind')),
    sa.CheckConstraint("source IN ('dsn', 'arf', 'smtp', 'mailto', 'manual')", name=op.f('ck_bounce_events_source')),
    sa.ForeignKeyConstraint(['campaign_id'], ['campaigns.id'], name=op.f('fk_bounce_events_campaign_id_campaigns'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['delivery_id'], ['deliveries.id'], name=op.f('fk_bounce_events_delivery_id_deliveries'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_bounce_events')),
    sa.UniqueConstraint('source_key', 'email_key', 'kind', name=op.f('uq_bounce_events_source_key_email_key_kind'))
    )
    with op.batch_alter_table('bounce_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_bounce_events_campaign_id_kind'), ['campaign_id', 'kind'], unique=False)
        batch_op.create_index(batch_op.f('ix_bounce_events_email_key_kind_created_at'), ['email_key', 'kind', 'created_at'], unique=False)

    op.create_table('delivery_attempts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('delivery_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('account', sa.String(length=200), nullable=False),
    sa.Column('reserved_at', sa.Double(), nullable=False),
    sa.Column('finished_at', sa.Double(), nullable=True),
    sa.Column('outcome', sa.String(length=20), nullable=True),
    sa.Column('smtp_code', sa.Integer(), nullable=True),
    sa.Column('smtp_enhanced', sa.String(length=20), nullable=True),
    sa.Column('smtp_text', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['delivery_id'], ['deliveries.id'], name=op.f('fk_delivery_attempts_delivery_id_deliveries'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_delivery_attempts'))
    )
    with op.batch_alter_table('delivery_attempts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_delivery_attempts_account_reserved_at'), ['account', 'reserved_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_delivery_attempts_delivery_id'), ['delivery_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('delivery_attempts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_delivery_attempts_delivery_id'))
        batch_op.drop_index(batch_op.f('ix_delivery_attempts_account_reserved_at'))

    op.drop_table('delivery_attempts')
    with op.batch_alter_table('bounce_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_bounce_events_email_key_kind_created_at'))
        batch_op.drop_index(batch_op.f('ix_bounce_events_campaign_id_kind'))

    op.drop_table('bounce_events')
    op.drop_table('suppressions')
    with op.batch_alter_table('list_members', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_list_members_subscriber_id'))

    op.drop_table('list_members')
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deliveries_state_next_attempt_at'))
        batch_op.drop_index(batch_op.f('ix_deliveries_lease_expires_at'))
        batch_op.drop_index(batch_op.f('ix_deliveries_email_key'))
        batch_op.drop_index(batch_op.f('ix_deliveries_campaign_id_state'))

    op.drop_table('deliveries')
    op.drop_table('campaign_lists')
    op.drop_table('subscribers')
    op.drop_table('mailbox_seen')
    op.drop_table('lists')
    op.drop_table('campaigns')
    op.drop_table('account_state')
